-- wrk: POST /generate with a fixed JSON body (ingress benchmark).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt":"a red circle on a blue background","seed":7,"width":64,"height":64,"num_inference_steps":10}'

-- wrk: POST /generate as bench/post.lua, each request with an Idempotency-Key of its own (as the
-- Python client sends with every submission).
wrk.method = "POST"
wrk.body = '{"prompt":"a red circle on a blue background","seed":7,"width":64,"height":64,"num_inference_steps":10}'
local thread_tag = string.format("%d-%d", os.time(), math.random(1, 1000000000))
local n = 0
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json", ["Idempotency-Key"] = thread_tag .. "-" .. n}
  return wrk.format(nil, nil, headers)
end

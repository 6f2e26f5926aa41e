"""`python -m imagegen_client ...` runs the `imagegen` CLI."""

from imagegen_client.cli import main

raise SystemExit(main())

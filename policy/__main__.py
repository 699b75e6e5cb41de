"""`python -m policy` is the `callpolicy` command."""

from policy.cli import main

raise SystemExit(main())

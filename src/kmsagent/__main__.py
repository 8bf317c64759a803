"""`python -m kmsagent`."""

from kmsagent.cli import main

raise SystemExit(main())

"""`python -m serve --help`: see serve/cli.py."""

from .cli import main

raise SystemExit(main())

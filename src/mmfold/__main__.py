"""``python -m mmfold`` runs the command line."""

from mmfold.cli import main

raise SystemExit(main())

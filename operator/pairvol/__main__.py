from pairvol.cli import main

raise SystemExit(main())

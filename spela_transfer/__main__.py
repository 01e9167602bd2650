from spela_transfer.cli import main

raise SystemExit(main())

from kvpfs.cli import main

raise SystemExit(main())

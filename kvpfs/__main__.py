from kvpfs.cli.main import main

raise SystemExit(main())

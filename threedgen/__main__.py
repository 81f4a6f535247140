from threedgen.cli import main

raise SystemExit(main())

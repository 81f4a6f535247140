from threedgen.cli import main

if __name__ == "__main__":  # guarded: the web UI's job processes are spawned and import __main__
    raise SystemExit(main())

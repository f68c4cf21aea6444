import sys

if sys.argv[1:2] == ["_compile"]:
    # The reload's compiling child (``compiler.child_command``): only what compiling
    # needs, so a reload does not wait for the whole command line to import.
    from gated import forward
    from gated.book import compiler
    from gated.book import config as config_mod

    config_mod.add_check(forward.check)
    sys.exit(compiler.main(sys.argv[2:]))

from gated.cli import main

sys.exit(main())

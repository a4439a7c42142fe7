from fpstune.cli.commands import main

main()

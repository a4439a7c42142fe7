from fpstune.cli import main

main()

from flsl_cli.cli.app import main

main()

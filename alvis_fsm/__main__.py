from alvis_fsm.fronts.cli.main import main

main()

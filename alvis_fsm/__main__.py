from alvis_fsm.cli import main

main()

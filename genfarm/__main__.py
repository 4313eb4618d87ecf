from genfarm.cli import main

main()

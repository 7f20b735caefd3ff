from cosock.cli import main

main()

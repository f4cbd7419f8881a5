from cilbench.cli import main

main()

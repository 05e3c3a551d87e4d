from micropod.cli import main

main()

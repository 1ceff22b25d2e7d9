from mtpcode.cli import main

main()

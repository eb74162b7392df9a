from tinycompress.cli.app import main

main()

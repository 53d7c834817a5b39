from logitcache.cli.main import main

main()

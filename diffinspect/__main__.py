from diffinspect.cli import main

main()

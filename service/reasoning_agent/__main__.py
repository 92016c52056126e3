from reasoning_agent.cli import main

raise SystemExit(main())

from arabic_words.cli import main

raise SystemExit(main())

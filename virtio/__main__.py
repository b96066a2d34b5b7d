from virtio.cli import main

raise SystemExit(main())

import sys

from tray_app.main import main

sys.exit(main())

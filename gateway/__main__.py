"""``python -m quiver.gateway --backend URL ... [--registry URL] [--router URL] [--port P]``."""

from quiver.gateway.server import main

main()

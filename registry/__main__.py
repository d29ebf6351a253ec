"""``python -m quiver.registry [--host H] [--port P] [--data-dir D]``."""

from __future__ import annotations

import argparse

from quiver.registry.server import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m quiver.registry")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    from quiver.registry.settings import Settings

    defaults = Settings()
    serve(args.host or defaults.host, args.port or defaults.port, args.data_dir)

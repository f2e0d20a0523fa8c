"""Offline datasets in Flashbax 0.1.3's Vault format: `Vault` (write, read, iter_chunks,
into_buffer) and `inspect`.

`python -m flax_replay.vault <path> [--json]` prints what a vault holds: structure, steps,
bytes on disk, compression. See `flax_replay._src.vault` for the on-disk format.
"""

from flax_replay._src.vault import Vault, VaultError, format_inspection, inspect

__all__ = ["Vault", "VaultError", "inspect", "format_inspection", "main"]


def main(argv: "list[str] | None" = None) -> int:
    """The command line: inspect each vault directory given."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m flax_replay.vault",
                                     description="Show what a vault holds.")
    parser.add_argument("paths", nargs="+", help="vault directories (<rel_dir>/<name>/<uid>)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            info = inspect(path)
        except VaultError as e:
            print(f"error: {e}")
            status = 1
            continue
        print(json.dumps(info, indent=1) if args.json else format_inspection(info))
    return status


if __name__ == "__main__":
    raise SystemExit(main())

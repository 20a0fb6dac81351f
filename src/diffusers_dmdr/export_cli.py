"""The `dmdr-export` command line: rebuild the export of a checkpoint, and push it.

```
dmdr-export --checkpoint output_dir/checkpoint-3000 --output_dir export [--push_to_hub --hub_model_id org/name]
python -m diffusers_dmdr.export_cli ...
```
"""

import argparse
import logging
import sys

from .config import parse_bool
from .export import export_checkpoint
from .hub import HubUploadError


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmdr-export",
        description="Export a DMDR checkpoint as a Hub-ready folder (and optionally push it).",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N folder, or a run's output_dir (latest)")
    parser.add_argument("--output_dir", required=True, help="the export folder (may be the run's output_dir)")
    # Boolean flags read like train.py's: bare (`--push_to_hub`) or with true/false/1/0/yes/no/on/off.
    boolean = {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    parser.add_argument("--push_to_hub", default=False, help="upload the folder to the Hub", **boolean)
    parser.add_argument("--hub_model_id", default=None, help="repo id org/name (default: the run's hub_model_id)")
    parser.add_argument(
        "--hub_private", default=None, help="create the repo as private (default: the run's)", **boolean
    )
    parser.add_argument(
        "--export_full_pipeline",
        default=None,
        help="also save the fused full pipeline in LoRA mode (default: the run's setting)",
        **boolean,
    )
    parser.add_argument(
        "--base_model",
        default=None,
        help="the teacher's Hub id (org/name) for the card and its snippets (default: the run's --base_model, or "
        "the teacher's own id when it was given as one)",
    )
    parser.add_argument("--device", default=None, help="device that samples the grid (default: cuda if available)")
    parser.add_argument(
        "--hub_timeout", type=float, default=None, help="seconds each Hub request may take (default: the run's)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_argument_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        output_dir = export_checkpoint(
            args.checkpoint,
            args.output_dir,
            push=args.push_to_hub,
            hub_model_id=args.hub_model_id,
            hub_private=args.hub_private,
            export_full_pipeline=args.export_full_pipeline,
            base_model=args.base_model,
            device=args.device,
            hub_timeout=args.hub_timeout,
        )
    except HubUploadError as error:
        print(error, file=sys.stderr)  # noqa: T201
        sys.exit(1)
    print(f"exported to {output_dir}")  # noqa: T201


if __name__ == "__main__":
    main()

"""``edge-agent``: the device's command line (``ask`` now; the daemon comes with MQTT)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.errors import AgentError
from agent.inference import Engine, GenerationRequest, load_pack
from agent.inference.sampling import SamplingParams
from agent.logs import configure_logging
from model_packs.errors import PackError
from model_packs.format import default_pack_path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--log-level", default="warning")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask", help="answer one question locally, streaming")
    a.add_argument("question")
    a.add_argument("--pack", type=Path, help="pack directory (default: the default pack in the cache)")
    a.add_argument("--max-tokens", type=int)
    a.add_argument("--temperature", type=float)
    a.add_argument("--top-k", type=int)
    a.add_argument("--top-p", type=float)
    a.add_argument("--repetition-penalty", type=float)
    a.add_argument("--seed", type=int)
    a.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    a.add_argument("--system", help="system prompt (default: the pack's)")
    a.add_argument("--threads", type=int)
    a.add_argument("--context-length", type=int)
    return p


def _pick(value: float | int | None, default: float | int) -> float | int:
    return default if value is None else value


def _ask(args: argparse.Namespace) -> int:
    path = args.pack or default_pack_path()
    if args.pack is None and not path.exists():
        print(f"edge-agent: no default pack at {path}; build it with: edge-pack build", file=sys.stderr)
        return 2
    pack = load_pack(path)
    gen = pack.manifest.generation
    engine = Engine(pack, threads=args.threads, context_length=args.context_length)
    sampling = SamplingParams(
        temperature=float(_pick(args.temperature, gen.temperature)),
        top_k=int(_pick(args.top_k, gen.top_k)),
        top_p=float(_pick(args.top_p, gen.top_p)),
        repetition_penalty=float(_pick(args.repetition_penalty, gen.repetition_penalty)),
        seed=args.seed,
    )
    prompt = engine.prompt_ids(args.question, args.system)
    req = GenerationRequest(prompt, int(_pick(args.max_tokens, gen.max_tokens)), sampling, tuple(args.stop))

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    done = engine.generate(req, on_delta=show)
    u = done.usage
    print(
        f"\n\n[{pack.manifest.name} {pack.manifest.version}] prompt {u.prompt_tokens} tokens, "
        f"completion {u.completion_tokens} tokens ({done.finish_reason}), "
        f"time to first token {u.time_to_first_token_s * 1000:.0f} ms, "
        f"decode {u.decode_tokens_per_s:.1f} tokens/s, {engine.threads} threads",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return _ask(args)
    except (AgentError, PackError) as exc:
        print(f"edge-agent: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Generate the quickstart data: GSM-style math word problems with worked solutions, offline.

Uses reasoning-gym's `gsm_symbolic` generator (Apache-2.0; `pip install reasoning-gym`), which
instantiates GSM8K-style templates with fresh numbers and ships a step-by-step solution
(`metadata["answer_cot"]`) for each problem. Nothing is downloaded.

Writes, next to this script:
  gsm_train.jsonl   ~400 rows, output ends with "#### <number>", in two layouts at once: alpaca
                    fields (instruction/input/output) and `messages` (user/assistant), so a
                    config can train with `type: alpaca` or `type: chat_template`
  gsm_test.jsonl    ~100 rows from a different seed, same fields plus `answer` for scoring
  chat_sample.jsonl  20 rows of `messages` (system/user/assistant) for the chat-template example

Run: python examples/data/make_gsm.py  (deterministic: same seeds, same files)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_SEED, TEST_SEED, CHAT_SEED = 42, 4242, 777
SYSTEM_PROMPT = "You are a careful math tutor. Solve the problem step by step and end with '#### <answer>'."


def _answer_text(value) -> str:
    """`14560.0` -> `14560`: GSM scoring compares the number after ####, so keep it canonical."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(value)


def solution(entry: dict) -> str:
    """The worked solution ending in exactly one `#### <answer>` line."""
    answer = _answer_text(entry["answer"])
    cot = (entry.get("metadata") or {}).get("answer_cot")
    if not cot:  # the generator always has one today; compose a minimal solution otherwise
        return f"The answer is {answer}.\n#### {answer}"
    body = re.sub(r"\n?####.*\s*$", "", cot.strip(), flags=re.S).rstrip()
    return f"{body}\n#### {answer}"


def generate(size: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`size` distinct problems from `seed`, skipping any question in `exclude`."""
    import reasoning_gym

    out, seen = [], set(exclude)
    pool = reasoning_gym.create_dataset("gsm_symbolic", size=size * 2, seed=seed)
    for entry in pool:
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        out.append(entry)
        if len(out) == size:
            return out
    raise RuntimeError(f"gsm_symbolic gave fewer than {size} distinct problems for seed {seed}")


def alpaca_row(entry: dict) -> dict:
    return {"instruction": entry["question"], "input": "", "output": solution(entry)}


def train_row(entry: dict) -> dict:
    """Alpaca fields and the same exchange as chat `messages`: an instruct model should be trained
    in its own chat format, where it already ends an answer with its end-of-turn token."""
    row = alpaca_row(entry)
    row["messages"] = [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["output"]},
    ]
    return row


def chat_row(entry: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": entry["question"]},
            {"role": "assistant", "content": solution(entry)},
        ]
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--chat-size", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    train = generate(args.train_size, TRAIN_SEED)
    train_questions = {e["question"] for e in train}
    test = generate(args.test_size, TEST_SEED, exclude=train_questions)
    chat = generate(args.chat_size, CHAT_SEED, exclude=train_questions | {e["question"] for e in test})

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "gsm_train.jsonl", [train_row(e) for e in train])
    write_jsonl(args.out / "gsm_test.jsonl", [dict(train_row(e), answer=_answer_text(e["answer"])) for e in test])
    write_jsonl(args.out / "chat_sample.jsonl", [chat_row(e) for e in chat])
    for name in ("gsm_train.jsonl", "gsm_test.jsonl", "chat_sample.jsonl"):
        path = args.out / name
        print(f"wrote {path} ({sum(1 for _ in path.open())} rows, {path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

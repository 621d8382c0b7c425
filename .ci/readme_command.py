"""Print one of the README's two set-up commands (the first line of each ```bash block): `first` or `test`."""

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The first line of every ```bash block of the README, in order."""
    lines = README.read_text().splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if line.strip() == "```bash"]


if __name__ == "__main__":
    print(readme_commands()[{"first": 0, "test": 1}[sys.argv[1]]])

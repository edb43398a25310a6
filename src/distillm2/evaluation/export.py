"""Exports of an evaluation's outputs for other tools.

``model_outputs.json`` in AlpacaEval's format (a JSON list of ``{"instruction", "output",
"generator"}``), and ``reference_outputs.json`` the same way for the references when there are
any, so that users can run ``alpaca_eval --model_outputs DIR/model_outputs.json
[--reference_outputs DIR/reference_outputs.json]`` with the judge and annotator of their choice.
The instruction is the prompt's user turns joined by newlines (AlpacaEval is single-turn);
system turns are left out.
"""

from __future__ import annotations

from pathlib import Path

from distillm2.files import write_json_atomic


def export_alpaca_eval(folder: str | Path, instructions: dict[str, str], outputs: dict[str, str], generator: str,
                       references: dict[str, str] | None = None,
                       reference_generator: str = "reference") -> list[Path]:
    """Write AlpacaEval files for the prompt ids of ``instructions`` (in their order) that have
    an output; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [i for i in instructions if i in outputs]
    written = [folder / "model_outputs.json"]
    write_json_atomic(written[0], [{"instruction": instructions[i], "output": outputs[i], "generator": generator}
                                   for i in ids])
    if references:
        written.append(folder / "reference_outputs.json")
        write_json_atomic(written[1], [{"instruction": instructions[i], "output": references[i],
                                        "generator": reference_generator} for i in ids if i in references])
    return written

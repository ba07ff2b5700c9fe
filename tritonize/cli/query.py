"""`tritonize query`: send one prompt to a served repository (NeMo query.py's flags work too)."""

from __future__ import annotations

import click

from ..serving.client import GenerateOptions, QueryError, grpc_generate, http_generate


@click.command()
@click.option("-m", "-mn", "--model-name", "--model_name", "model_name", required=True,
              help="The ensemble's name (generate's --model-name).")
@click.option("-p", "--prompt", required=True, help="Text to complete.")
@click.option("-u", "--url", default="127.0.0.1:8001", show_default=True,
              help="gRPC host:port, or http://host:port for Triton's HTTP generate endpoints.")
@click.option("--max-tokens", "-mol", "--max-output-len", "--max_output_len", "max_tokens", default=64,
              show_default=True, type=int, help="Tokens to generate at most.")
@click.option("--top-k", "-topk", "--top_k", "top_k", type=int, default=None, help="Sample from the k likeliest.")
@click.option("--top-p", "-topp", "--top_p", "top_p", type=float, default=None, help="Nucleus sampling mass.")
@click.option("--temperature", "-t", type=float, default=None, help="Sampling temperature; sampling needs --top-k above 1 or --top-p (else greedy).")
@click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text.")
@click.option("--stop-words", "-swl", "--stop_words_list", "stop_words", multiple=True,
              help="Stop when this text is generated (repeatable).")
@click.option("--bad-words", "-bwl", "--bad_words_list", "bad_words", multiple=True,
              help="Never generate this text (repeatable).")
@click.option("--stream/--no-stream", "-s", default=False, help="Print the text as it is generated.")
@click.option("--include-prompt", is_flag=True, help="Return the prompt followed by the completion.")
@click.option("--task-id", "--task_id", "task_id", type=click.IntRange(min=0), default=None,
              help="P-tuning task served by the repository (generate --ptuning-nemo-checkpoint).")
@click.option("--lora-task-id", "--lora_task_id", "lora_task_id", type=click.IntRange(min=0), default=None,
              help="LoRA adapter served by the repository (generate --lora-ckpt).")
@click.option("--guide-type", type=click.Choice(["json", "json_schema", "regex", "ebnf_grammar", "structural_tag"]),
              default=None, help="Structured output: the answer follows --guide (json: any JSON object).")
@click.option("--guide", default=None,
              help="The JSON schema, regular expression or EBNF grammar of --guide-type; @FILE reads it from FILE.")
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds to wait for the answer.")
def query(model_name: str, prompt: str, url: str, max_tokens: int, top_k: int | None, top_p: float | None,
          temperature: float | None, seed: int | None, stop_words: tuple[str, ...], bad_words: tuple[str, ...],
          stream: bool, include_prompt: bool, task_id: int | None, lora_task_id: int | None,
          guide_type: str | None, guide: str | None, timeout: float) -> None:
    """Send PROMPT to a served model and print the generated text.

    \b
    Examples:
      tritonize query -m tiny -p "What is the color of a banana?" --max-tokens 16
      tritonize query -mn tiny -p "Once upon a time" -mol 32 --stream --top-k 40 --temperature 0.8
      tritonize query -m tiny -p "Hello" -u http://127.0.0.1:8000
      tritonize query -m tiny -p "Summarize: ..." --lora-task-id 1 --task-id 0
      tritonize query -m tiny -p "A fruit and its color:" --guide-type json_schema --guide @fruit.schema.json
    """
    if guide is not None and guide.startswith("@"):
        try:
            with open(guide[1:], encoding="utf-8") as f:
                guide = f.read()
        except OSError as e:
            raise click.BadParameter(f"cannot read {guide[1:]}: {e.strerror}", param_hint="--guide") from None
    if guide is not None and guide_type is None:
        raise click.BadParameter("--guide needs --guide-type", param_hint="--guide")
    opts = GenerateOptions(
        max_tokens=max_tokens, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed,
        stop_words=list(stop_words), bad_words=list(bad_words), exclude_input_in_output=not include_prompt,
        task_id=task_id, lora_task_id=lora_task_id, guide_type=guide_type, guide=guide,
    )
    send = http_generate if url.startswith(("http://", "https://")) else grpc_generate
    on_piece = (lambda piece: click.echo(piece, nl=False)) if stream else None
    try:
        result = send(url, model_name, prompt, opts, stream=stream, on_piece=on_piece, timeout=timeout)
    except QueryError as e:
        raise click.ClickException(str(e)) from None
    if stream:
        click.echo()
    else:
        click.echo(result.text)

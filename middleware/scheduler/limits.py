"""A deployment's limits on a request, beyond the wire format's: pure checks, no I/O.

The scheduler applies them to every request it takes (an error answer); the CLI applies the same
checks to every input line before it starts anything (exit 2).
"""

from __future__ import annotations

from schemas import AlignRequest, ErrorCode, ErrorInfo

__all__ = ["check_limits", "prompt_chars"]


def prompt_chars(request: AlignRequest) -> int:
    prompt = request.prompt
    return len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)


def check_limits(request: AlignRequest, *, max_budget: int, max_prompt_chars: int) -> ErrorInfo | None:
    """A bad_request error past ``max_budget`` or ``max_prompt_chars``, else None (the schema checked the rest)."""
    if request.budget is not None and request.budget > max_budget:
        return ErrorInfo(code=ErrorCode.BAD_REQUEST, message=f"budget {request.budget} > max_budget {max_budget}")
    num_chars = prompt_chars(request)
    if num_chars > max_prompt_chars:
        return ErrorInfo(code=ErrorCode.BAD_REQUEST,
                         message=f"prompt has {num_chars} characters > max_prompt_chars {max_prompt_chars}")
    return None

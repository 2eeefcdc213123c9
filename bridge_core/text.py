"""Text helpers of the bridge, with TransformerLens's names and defaults.

`TextMixin` is a mixin of `TransformerBridge`. Text is tokenized by the model's own
tokenizer; ``prepend_bos=None`` means the config's ``default_prepend_bos`` (True unless an
adapter says otherwise, as in TransformerLens), so GPT-2 text gets a BOS token too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from bridge_core import tokens
from bridge_core.errors import InputError

if TYPE_CHECKING:
    from bridge_core.config import TransformerBridgeConfig


class TextMixin(nn.Module):
    """`to_tokens`, `to_str_tokens`, `to_string`, `to_single_token` and friends."""

    cfg: TransformerBridgeConfig

    @property
    def tokenizer(self) -> Any:  # the bridge loads it lazily
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def prepend_bos_for(self, prepend_bos: bool | None) -> bool:
        """`prepend_bos`, or the config's ``default_prepend_bos`` for None."""
        return self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos

    def to_tokens(
        self,
        input: tokens.TextInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Token ids ``[batch, pos]`` for text (a batch of one for a string).

        Args:
            prepend_bos: add (True) or leave out (False) the BOS token; None: the config's
                ``default_prepend_bos``.
            padding_side: "left" or "right" for texts of different lengths (default: the
                tokenizer's).
            truncate: cut each text to the model's context length ``cfg.n_ctx``.
        """
        if not isinstance(input, str | list):
            raise InputError(f"to_tokens takes a string or a list of strings (got {type(input)})")
        max_length = self.cfg.n_ctx if truncate else None
        ids = tokens.tokenize(
            self.tokenizer, input, self.prepend_bos_for(prepend_bos), padding_side, max_length
        )["input_ids"]
        return ids.to(self.device) if move_to_device else ids

    def to_str_tokens(
        self,
        input: tokens.TextInput | torch.Tensor | Sequence[int],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string: a list for one sequence, a list per text for a batch."""
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self._strs(self.to_tokens(t, prepend_bos, padding_side)[0]) for t in input]
        if isinstance(input, str):
            return self._strs(self.to_tokens(input, prepend_bos, padding_side)[0])
        ids = torch.as_tensor(input)
        if ids.dim() == 2 and ids.shape[0] > 1:
            return [self._strs(row) for row in ids]
        return self._strs(ids.reshape(-1))

    def _strs(self, ids: torch.Tensor) -> list[str]:
        return [str(tokens.decode(self.tokenizer, [int(t)])) for t in ids.tolist()]

    def to_string(self, tokens_: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode tokens to text (a list of strings for a batch)."""
        return tokens.decode(self.tokenizer, tokens_)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token.

        Raises:
            InputError: the string is not exactly one token.
        """
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if ids.numel() != 1:
            raise InputError(
                f"{string!r} is {ids.numel()} tokens ({self._strs(ids)}), not one; "
                "use to_tokens for several"
            )
        return int(ids.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if not isinstance(int_token, int) or isinstance(int_token, bool):
            raise InputError(f"to_single_str_token takes a token id, an int (got {int_token!r})")
        return self._strs(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: str | int | torch.Tensor,
        input: str | torch.Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """Where a token occurs in a text or sequence of ids (``[pos]`` or ``[1, pos]``).

        Raises:
            InputError: the token does not occur, a batch of more than one, or a bad mode.
        """
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last' (got {mode!r})")
        ids = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else input
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InputError(f"ids of rank 2 must be one sequence, [1, pos] (got {ids.shape})")
            ids = ids[0]
        if isinstance(single_token, str):
            token = self.to_single_token(single_token)
        else:
            token = int(single_token)
        found = (ids == token).nonzero().flatten().tolist()
        if not found:
            raise InputError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur")
        return int(found[0] if mode == "first" else found[-1])

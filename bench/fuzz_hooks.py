"""Schemathesis hooks for bench/bench_fuzz.py: valid POST /v1/sessions cases get a real SDP offer half the time.

Generated text is never an offer the server can answer; with it alone every POST is a 400 and no session is
opened for the stateful links to reach. The offers come from the file named by STREAMEDIT_FUZZ_OFFERS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

OFFERS: list[str] = json.loads(Path(os.environ["STREAMEDIT_FUZZ_OFFERS"]).read_text())


@schemathesis.hook("flatmap_case").apply_to(method="POST", path="/v1/sessions")
def with_real_offers(context: schemathesis.HookContext, case: schemathesis.Case) -> st.SearchStrategy:
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE or not isinstance(case.body, dict):
        return st.just(case)

    def offering(sdp: str) -> schemathesis.Case:
        case.body = {**case.body, "sdp": sdp}
        return case

    return st.one_of(st.just(case), st.sampled_from(OFFERS).map(offering))

"""Integrations with evaluation frameworks. Each submodule needs its framework installed and is loaded by that
framework (e.g. :mod:`divico.integrations.lmms_eval` through lmms-eval's ``lmms_eval.models`` entry point);
``import divico`` imports none of them."""

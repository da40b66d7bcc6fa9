#!/usr/bin/env bash
# Creates, once, the virtual environment in which tests/test_verl_integration.py runs verl's code
# (verl pins transformers < 5.11, which the main environment does not have). It holds verl 0.9.1
# without its dependencies and only what importing verl.trainer.ppo.core_algos needs (verl imports
# ray, tensordict, transformers and omegaconf there), plus pytest; frpo_kernels comes from this
# checkout through PYTHONPATH. torch is pinned so that no other build is ever pulled in.
# Reruns are a no-op while the stamp (Python, pins) matches. FRPO_VERL_VENV: where (default .venv-verl).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FRPO_VERL_VENV:-.venv-verl}
python=${PYTHON:-python}
verl_spec="verl==0.9.1"
pins="torch==2.13.0 transformers==5.10.4 tensordict==0.10.0 ray==2.60.0 omegaconf==2.4.0 numpy==2.4.6
packaging==25.0 codetiming==1.4.0 pytest==9.0.3"
# what those pull in, at the versions tested (keeps the resolver's answer fixed)
constraints="annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 attrs==26.1.0 certifi==2026.10.19.post1
charset-normalizer==3.5.3 click==8.5.1 cloudpickle==3.1.3 filelock==4.3.1 fsspec==2026.9.0 h11==0.16.0
hf-xet==1.8.0 httpcore==1.0.9 httpx==0.28.1 huggingface_hub==1.33.0 idna==3.20 importlib_metadata==10.2.0
iniconfig==2.3.1 Jinja2==3.1.6 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 markdown-it-py==4.3.0
MarkupSafe==3.0.4 mdurl==0.1.2 mpmath==1.3.0 msgpack==1.2.4 networkx==3.6.1 orjson==3.13.0 pluggy==1.7.0
protobuf==7.36.2 pydantic==2.14.4 pydantic_core==2.50.5 Pygments==2.21.0 pyvers==0.1.0 PyYAML==6.0.4
referencing==0.37.0 regex==2026.11.19 requests==2.34.2 rich==15.0.0 rpds-py==2026.9.1 safetensors==0.8.0
shellingham==1.5.4 sympy==1.14.0 tokenizers==0.22.2 tqdm==4.70.1 typer==0.29.2 typing-inspection==0.4.5
typing_extensions==4.16.0 urllib3==2.8.0 zipp==4.1.2"
stamp="$venv/frpo-verl-stamp"
want="$("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])') $verl_spec $pins"

. scripts/venv_cache.sh
venv_begin "$venv" "$stamp" "$want" "verl venv ($verl_spec)"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
cfile=$(mktemp)
trap 'rm -f "$cfile"' EXIT
tr ' ' '\n' <<<"$pins $constraints" >"$cfile"
# shellcheck disable=SC2086
"${pip[@]}" -c "$cfile" $pins
"${pip[@]}" --no-deps "$verl_spec"
PYTHONPATH=. "$venv/bin/python" -c "import verl.trainer.ppo.core_algos, frpo_kernels.integrations.verl"
venv_done

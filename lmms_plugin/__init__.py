"""lmms-eval integration: the pruned model (learned or training-free) as an lmms-eval model named ``pruned_llava``.

    pip install -r requirements-lmms-eval.txt && pip install --no-deps -e .    # a separate venv (README)
    lmms-eval --model pruned_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,pruner=outputs/pruned_best \
        --tasks gqa,pope,mme,textvqa_val
    lmms-eval --model pruned_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=0.25 ...

lmms-eval finds the model through the ``lmms_eval.models`` entry point (pyproject.toml), which
points at :func:`manifests`; the class is lmms_plugin/model.py.
"""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="pruned_llava", simple_class_path="lmms_plugin.model.PrunedLlavaEval")]

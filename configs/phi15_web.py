"""phi-1.5-web (technical report, section 2.4): phi-1.5's recipe on a mix of filtered web data, phi-1's code data and
the synthetic textbooks, "in proportions roughly 40%, 20%, 40%".

Three directories from tools/prepare_data.py with the same tokenizer, in that order:
    --config.data.path=DATA/web_filtered,DATA/phi1,DATA/textbooks
README's "Making the data" makes each: the web through phi-1's quality filter (tools.quality_filter), the textbooks
with tools.synthesize, all deduplicated and decontaminated (tools.dedup).
"""

from configs.phi15 import get_config as phi15_config


def get_config():
    c = phi15_config()
    c.data.mixture_weights = "0.4,0.2,0.4"  # filtered web, phi-1 code data, synthetic textbooks
    return c

"""Making phi-1.5's data: synthetic textbooks from topic seeds (synthesize), phi-1's quality filter (annotate,
embed, classifier, quality_filter), deduplication and decontamination (dedup, decontaminate). The command-line
entry points are tools/synthesize.py, tools/quality_filter.py and tools/dedup.py; README's "Making the data" walks
through them."""

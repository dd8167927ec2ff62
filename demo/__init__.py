"""The embedded demo: a procedural data set of coloured shapes (``demo.shapes``) that the demo pipeline
(``scripts/run_demo.sh``) trains every stage on, and scores its answers and generated images against; and the
stand-in LLM (``demo.llm``) that the demo, the tests and the benchmarks build."""

"""Past one machine on Ray: batch jobs (Ray Data) and engine replicas behind one server (Ray Serve).

An optional extra (``pip install "qwen2audio[ray]"``): nothing outside this package imports it, and
each entry point checks that Ray is installed before any work starts.
"""

"""The DERP-map coordinator: publishes a live, health-aware ``tailcfg.DERPMap``.

Modules:
    model      regions and nodes with Tailscale's JSON field names and omitempty rules
    yamlout    the same map as headscale's ``derp.paths`` YAML (lower-cased Go field names)
    config     the TOML config file, with errors that name file, line and field
    state      static + self-registered nodes, health, TTLs, the published map
    persist    the state file: registrations and the last map across restarts
    registration  validation of ``POST /v1/nodes`` bodies
    prober     health probes: ``/derp/probe``, DERP login + relayed packet, STUN
    httpclient httpx on Trio with our TLS rules, timeouts and answer caps
    app        the ASGI app (served by hypercorn's Trio worker)
    status     the HTML status page
    announce   the node side of self-registration (``derpd serve --coordinator``)
    cli        ``derpd coordinator``
"""

# Evaluates ../default.nix with stub-lib.nix (no nixpkgs needed) and
# returns what tests/nixos_module.rs checks:
#
#   nix-instantiate --eval --strict --json nixos-module/tests/stub-eval.nix \
#     --argstr settings '{"channel": "nixos-unstable"}'
#
# `settings` (JSON) are services.nixery values on top of the defaults,
# as a user's configuration would set them.
{
  settings ? "{}",
}:

let
  lib = import ./stub-lib.nix;

  # The build-time check's script is carried in the fake output path, so
  # that the test can run it against the real binary.
  pkgs = {
    callPackage = _: _: throw "stub-eval sets services.nixery.package";
    runCommand = name: _attrs: script: {
      outPath = "<<${name}:${script}>>";
    };
  };

  module = import ../default.nix { inherit lib pkgs config; };
  options = module.options.services.nixery;

  # Option defaults, nested sets (such as `tls`) included.
  defaults = builtins.mapAttrs (_: o: if (o._type or null) == "option" then o.default else defaults o);
  # Settings on top of defaults, one level of nesting deep.
  merge =
    base: over:
    base
    // builtins.mapAttrs (
      n: v: if builtins.isAttrs v && builtins.isAttrs (base.${n} or null) then base.${n} // v else v
    ) over;

  config = {
    services.nixery = merge (defaults options) (
      {
        enable = true;
        # Replaced by the test with the binary it built.
        package = "@NIXERY@";
      }
      // builtins.fromJSON settings
    );
    nix.enable = true;
  };

  resolved = lib.resolveIfs module.config;
  unit = resolved.systemd.services.nixery;
in
{
  options = builtins.attrNames options;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) resolved.assertions);
  inherit (unit)
    environment
    serviceConfig
    after
    requires
    wantedBy
    ;
  wants = unit.wants or [ ];
  acmeCerts = resolved.security.acme.certs or { };
  firewall = resolved.networking.firewall.allowedTCPPorts or [ ];
  bucketGc = resolved.systemd.services.nixery-bucket-gc or null;
  bucketGcTimer = resolved.systemd.timers.nixery-bucket-gc or null;
}

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

  config = {
    services.nixery =
      # An option's default, or those of a group of options (nixCache).
      builtins.mapAttrs (
        _: o: if o ? _type then o.default else builtins.mapAttrs (_: x: x.default) o
      ) options
      // {
        enable = true;
        # Replaced by the test with the binary it built.
        package = "@NIXERY@";
      }
      // builtins.fromJSON settings;
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
  firewall = resolved.networking.firewall.allowedTCPPorts or [ ];
  bucketGc = resolved.systemd.services.nixery-bucket-gc or null;
  bucketGcTimer = resolved.systemd.timers.nixery-bucket-gc or null;
}

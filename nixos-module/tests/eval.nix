# Evaluates the module with nixpkgs' NixOS module system (lib.evalModules
# through nixos/lib/eval-config.nix) and option types, for those who have
# nixpkgs; CI here has none and uses stub-eval.nix instead.
#
#   nix-instantiate --eval --strict nixos-module/tests/eval.nix --arg nixpkgs '<nixpkgs>'
#
# Yields true, or fails saying what is wrong. Nothing is built.
{
  nixpkgs,
  system ? builtins.currentSystem,
}:

let
  lib = import "${nixpkgs}/lib";

  evalNixery =
    settings:
    import "${nixpkgs}/nixos/lib/eval-config.nix" {
      inherit system;
      modules = [
        ../default.nix
        {
          # No boot loader or file systems to declare.
          boot.isContainer = true;
          system.stateVersion = lib.trivial.release;
          services.nixery = {
            enable = true;
          }
          // settings;
        }
      ];
    };

  failedAssertions =
    eval: map (a: a.message) (lib.filter (a: !a.assertion) eval.config.assertions);

  good = evalNixery { channel = "nixos-unstable"; };
  # Rendering the unit forces every setting, the package and the
  # build-time check derivation included.
  unit = good.config.systemd.units."nixery.service".text;
  has = line: lib.hasInfix line unit || throw "nixery.service lacks ${line}:\n${unit}";

  rejected =
    settings:
    !(builtins.tryEval (builtins.deepSeq (evalNixery settings).config.systemd.services.nixery.environment true)).success;

  checks = [
    (failedAssertions good == [ ] || throw (lib.concatLines (failedAssertions good)))
    (has "Type=notify")
    (has "DynamicUser=true")
    (has "ProtectSystem=strict")
    (has "ProtectHome=true")
    (has "PrivateTmp=true")
    (has "NoNewPrivileges=true")
    (has "CapabilityBoundingSet=")
    (has "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6")
    (has "SystemCallFilter=@system-service")
    (has "StateDirectory=nixery")
    (has "NIX_REMOTE=daemon")
    (has "NIXERY_CHANNEL=nixos-unstable")
    (has "check-config")
    (lib.elem "nix-daemon.socket" good.config.systemd.services.nixery.requires)
    (lib.elem "nix-daemon.socket" good.config.systemd.services.nixery.after)
    (
      failedAssertions (evalNixery {
        channel = "a";
        pkgsPath = "/p";
      }) != [ ]
    )
    (failedAssertions (evalNixery { }) != [ ])
    # Option types turn away what the binary would.
    (rejected {
      channel = "a";
      layerBudget = 0;
    })
    (rejected {
      channel = "a";
      logFormat = "xml";
    })
    (rejected {
      channel = "a";
      layering = "best";
    })
    (rejected {
      channel = "a";
      port = 70000;
    })
  ];
in
lib.all (ok: ok) checks

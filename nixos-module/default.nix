# NixOS module for nixery: `services.nixery.enable = true;`.
#
# The server runs as a dynamic user and builds through the system's
# nix-daemon; every setting becomes one of the environment variables
# `nixery serve` reads, and `nixery check-config` validates them when the
# system is built.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    concatStringsSep
    filterAttrs
    hasPrefix
    literalExpression
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.nixery;

  sourceOptions = {
    channel = "NIXERY_CHANNEL";
    pkgsRepo = "NIXERY_PKGS_REPO";
    pkgsPath = "NIXERY_PKGS_PATH";
    flake = "NIXERY_FLAKE";
  };
  sourcesSet = builtins.filter (name: cfg.${name} != null) (builtins.attrNames sourceOptions);

  stateDir = "/var/lib/";
  # StateDirectory= creates the storage directory (owned by the dynamic
  # user) when it lies under /var/lib; anywhere else it must be made
  # writable with ReadWritePaths= and prepared by the administrator.
  storageInStateDir = hasPrefix stateDir cfg.storagePath && cfg.storagePath != stateDir;

  cacheDir = "/var/cache/nixery";

  # TLS: files of the administrator's, or those security.acme renews for
  # a host; either way handed over as credentials (root copies them for
  # the dynamic user, and keys never enter the Nix store).
  acmeHost = cfg.tls.acmeHost;
  acmeDir =
    if acmeHost == null then
      null
    else
      (config.security.acme.certs.${acmeHost} or { }).directory or "/var/lib/acme/${acmeHost}";
  tlsCert = if acmeHost != null then "${acmeDir}/fullchain.pem" else cfg.tls.certFile;
  tlsKey = if acmeHost != null then "${acmeDir}/key.pem" else cfg.tls.keyFile;
  tlsOn = tlsCert != null && tlsKey != null;
  acmeUnits = if acmeHost == null then [ ] else [ "acme-${acmeHost}.service" ];
  # Secrets systemd copies into the unit's credentials directory.
  credentials =
    (if cfg.htpasswdFile == null then [ ] else [ "htpasswd:${cfg.htpasswdFile}" ])
    ++ (
      if tlsOn then
        [
          "tls-cert:${tlsCert}"
          "tls-key:${tlsKey}"
        ]
      else
        [ ]
    )
    ++ (
      if cfg.nixCache.enable && cfg.nixCache.secretKeyFile != null then
        [ "nix-cache-key:${cfg.nixCache.secretKeyFile}" ]
      else
        [ ]
    );
  outsideStore = path: path == null || (hasPrefix "/" path && !hasPrefix "${builtins.storeDir}/" path);

  nixOptionsValue = concatStringsSep ";" (mapAttrsToList (n: v: "${n}=${v}") cfg.nixOptions);

  # What the service runs with; null settings are left out so the
  # binary's own defaults apply.
  environment =
    filterAttrs (_: v: v != null) {
      PORT = toString cfg.port;
      NIXERY_LISTEN_ADDRESS = cfg.listenAddress;
      NIXERY_CHANNEL = cfg.channel;
      NIXERY_PKGS_REPO = cfg.pkgsRepo;
      NIXERY_PKGS_PATH = cfg.pkgsPath;
      NIXERY_FLAKE = cfg.flake;
      NIXERY_STORAGE_BACKEND = cfg.storageBackend;
      STORAGE_PATH = cfg.storagePath;
      NIXERY_S3_BUCKET = cfg.s3Bucket;
      NIXERY_S3_PREFIX = cfg.s3Prefix;
      NIXERY_S3_ENDPOINT = cfg.s3Endpoint;
      NIXERY_S3_REGION = cfg.s3Region;
      NIXERY_S3_FORCE_PATH_STYLE = if cfg.s3ForcePathStyle then "true" else null;
      NIXERY_S3_REDIRECT = if cfg.s3Redirect then "true" else null;
      NIX_TIMEOUT = toString cfg.nixTimeout;
      NIX_POPULARITY_URL = cfg.popularityUrl;
      NIXERY_MAX_BUILDS = toString cfg.maxConcurrentBuilds;
      NIXERY_MAX_QUEUED_BUILDS = toString cfg.maxQueuedBuilds;
      NIXERY_MAX_STORAGE = cfg.maxStorage;
      NIXERY_MIN_FREE_SPACE = cfg.minFreeSpace;
      NIXERY_GC_LEASE = toString cfg.gcLease;
      NIXERY_SCRUB_INTERVAL = toString cfg.scrubInterval;
      NIXERY_SCRUB_RATE = toString cfg.scrubRate;
      NIXERY_NIX_OPTIONS = if cfg.nixOptions == { } then null else nixOptionsValue;
      NIXERY_LAYER_BUDGET = toString cfg.layerBudget;
      NIXERY_LAYERING = cfg.layering;
      NIXERY_CACHE_TTL = toString cfg.cacheTtl;
      NIXERY_LOG_FORMAT = cfg.logFormat;
      # systemd copies the file into the unit's credentials directory (%d),
      # readable only by the service, so it never enters the Nix store.
      NIXERY_HTPASSWD = if cfg.htpasswdFile == null then null else "%d/htpasswd";
      NIXERY_METRICS_PUBLIC = if cfg.metricsPublic then "true" else null;
      NIXERY_TLS_CERT = if tlsOn then "%d/tls-cert" else null;
      NIXERY_TLS_KEY = if tlsOn then "%d/tls-key" else null;
      # The same for the Nix cache's secret key.
      NIXERY_NIX_CACHE_KEY = if cfg.nixCache.enable then "%d/nix-cache-key" else null;
      # The store belongs to the nix-daemon; the dynamic user only talks
      # to it.
      NIX_REMOTE = "daemon";
      # Nix keeps fetchTarball/fetchGit caches (channel and pkgsRepo
      # sources) and other state under HOME: the unit's cache directory.
      HOME = cacheDir;
      XDG_CACHE_HOME = cacheDir;
    }
    // cfg.extraEnvironment;

  nixery = "${cfg.package}/bin/nixery";

  s3Environment = filterAttrs (n: _: hasPrefix "NIXERY_S3_" n) environment // {
    NIXERY_STORAGE_BACKEND = "s3";
  };
  collectsBucket = cfg.storageBackend == "s3" && cfg.s3CollectSchedule != null;

  # What every unit of the module shares: no privileges, no view of the
  # rest of the system.
  hardening = {
    DynamicUser = true;
    UMask = "0077";
    # Talking to the daemon needs only connect(2) on its socket, which a
    # read-only /nix does not prevent.
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateUsers = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = [ "" ];
    AmbientCapabilities = [ "" ];
    DeviceAllow = [ "" ];
    DevicePolicy = "closed";
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    RemoveIPC = true;
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    # Not ~@resources: the Nix client raises its stack limit with
    # setrlimit(2).
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    # A filtered call fails instead of killing a build mid-way.
    SystemCallErrorNumber = "EPERM";
  };

  # Runs check-config on the unit's environment (the environment file,
  # holding secrets, is not available to a build), so a bad setting fails
  # the system build. Paths of the running system do not exist in the
  # build sandbox, hence --no-filesystem-checks.
  checked =
    pkgs.runCommand "nixery-checked-config"
      {
        preferLocalBuild = true;
        allowSubstitutes = false;
      }
      ''
        env -i ${lib.escapeShellArgs (mapAttrsToList (n: v: "${n}=${v}") environment)} \
          ${nixery} check-config --no-filesystem-checks
        mkdir -p $out/bin
        ln -s ${nixery} $out/bin/nixery
      '';

  executable = if cfg.checkConfig then "${checked}/bin/nixery" else nixery;

  nullOrStr =
    description: example:
    mkOption {
      type = types.nullOr types.str;
      default = null;
      inherit description example;
    };
in
{
  options.services.nixery = {
    enable = mkEnableOption "nixery, a container registry that builds images on demand with Nix";

    # Not mkPackageOption: nixpkgs' `nixery` attribute is the original Go
    # server, which has neither `serve` nor `check-config`.
    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./nix/package.nix { } # from this repository";
      description = "The nixery package to run.";
    };

    listenAddress = mkOption {
      type = types.str;
      default = "0.0.0.0";
      example = "::";
      description = "IP address to listen on.";
    };

    port = mkOption {
      type = types.port;
      default = 8080;
      description = "HTTP port of the registry.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open {option}`services.nixery.port` in the firewall.";
    };

    storagePath = mkOption {
      type = types.str;
      default = "/var/lib/nixery";
      description = ''
        Directory for blobs and the database. Under {file}`/var/lib` it is
        created by systemd (`StateDirectory=`); elsewhere it must exist and
        be writable by the service, which runs as a dynamic user.
      '';
    };

    storageBackend = mkOption {
      type = types.enum [
        "filesystem"
        "s3"
      ];
      default = "filesystem";
      description = ''
        Where images are kept: `filesystem` ({option}`storagePath`), or
        `s3`, a bucket that several replicas share ({option}`storagePath`
        then holds this replica's database and staging area). S3
        credentials (`AWS_ACCESS_KEY_ID=...`, `AWS_SECRET_ACCESS_KEY=...`)
        belong in {option}`services.nixery.environmentFile`.
      '';
    };

    s3Bucket = nullOrStr "S3 bucket (required with the `s3` backend)." "nixery-images";

    s3Prefix = nullOrStr "Key prefix inside the bucket." "registry";

    s3Endpoint = nullOrStr ''
      Endpoint URL of an S3 store other than AWS (SeaweedFS, MinIO, Ceph
      RGW, Garage).
    '' "http://seaweedfs.internal:8333";

    s3Region = nullOrStr "S3 region (default us-east-1)." "eu-west-1";

    s3ForcePathStyle = mkOption {
      type = types.bool;
      default = false;
      description = "Address the bucket as `endpoint/bucket/key` rather than `bucket.endpoint/key`.";
    };

    s3Redirect = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Answer blob pulls with a redirect to a presigned URL of the bucket,
        so clients download from the object storage directly.
      '';
    };

    s3CollectSchedule = nullOrStr ''
      When to collect garbage in the bucket (`nixery gc` on it, run by the
      timer `nixery-bucket-gc`), as a systemd calendar event; `null`:
      never. Without it the bucket only grows: old builds and
      blobs of interrupted builds stay.
    '' "daily";

    s3MaxStorage = nullOrStr ''
      With {option}`s3CollectSchedule`: most bytes of blobs to keep in the
      bucket, e.g. `"500G"`; beyond it the images least recently pulled at
      any replica (or built) are evicted. `null`: only unreferenced blobs go.
    '' "500G";

    s3CollectKeepRecent = mkOption {
      type = types.ints.unsigned;
      default = 3600;
      description = ''
        With {option}`s3CollectSchedule`: seconds during which a new blob,
        or an image built or confirmed current, is kept whatever the quota
        (a build uploads its blobs before the records that name them).
      '';
    };

    channel = nullOrStr ''
      Package source: a nixpkgs channel name or commit, or a nixpkgs
      tarball URL. Exactly one of {option}`channel`, {option}`pkgsRepo`,
      {option}`pkgsPath` and {option}`flake` must be set.
    '' "nixos-unstable";

    pkgsRepo = nullOrStr ''
      Package source: a git repository with a package set; image tags
      select its refs. Credentials belong in
      {option}`services.nixery.environmentFile` as `NIXERY_PKGS_REPO=...`,
      which overrides this value at run time.
    '' "https://github.com/NixOS/nixpkgs";

    pkgsPath = nullOrStr ''
      Package source: an absolute path to a local package set.
    '' (literalExpression ''"''${pkgs.path}"'');

    flake = nullOrStr ''
      Package source: a flake reference whose packages are served.
    '' "github:NixOS/nixpkgs/nixos-unstable";

    nixTimeout = mkOption {
      type = types.ints.positive;
      default = 60;
      description = "Seconds each Nix invocation may run.";
    };

    popularityUrl = nullOrStr ''
      File path or http(s) URL of JSON `{"name": count}` popularity data,
      used to lay out layers.
    '' "https://example.org/popularity.json";

    maxConcurrentBuilds = mkOption {
      type = types.ints.positive;
      default = 2;
      description = "Image builds that may run at once; more wait their turn.";
    };

    maxQueuedBuilds = mkOption {
      type = types.ints.positive;
      default = 32;
      description = ''
        Image builds that may wait for a build slot; a pull that needs a new
        build beyond them is answered 429 with Retry-After (images already
        built are still served).
      '';
    };

    maxStorage = nullOrStr ''
      Most bytes of blobs to keep, e.g. `"50G"` (K, M, G, T are powers of
      1024). Beyond it the garbage collector evicts the least recently
      pulled images. `null`: no quota.
    '' "50G";

    minFreeSpace = nullOrStr ''
      Least free space to leave on the storage path's file system, e.g.
      `"5G"`; below it the least recently pulled images are evicted.
      `null`: no limit.
    '' "5G";

    gcLease = mkOption {
      type = types.ints.unsigned;
      default = 120;
      description = ''
        Seconds during which serving an image's manifest keeps the image
        from eviction (its client is fetching the blobs); each blob fetched
        starts it again. A collection held back by leases runs again when
        the first ends. Below {option}`minFreeSpace` leases do not hold.
      '';
    };

    scrubInterval = mkOption {
      type = types.ints.unsigned;
      default = 604800;
      description = ''
        Seconds between scrubs: passes that hash every stored blob again and
        move damaged ones to `quarantine/` (their images are built again on
        the next pull). Weekly by default; `0`: never.
      '';
    };

    scrubRate = mkOption {
      type = types.ints.positive;
      default = 20;
      description = ''
        Most MiB a second a scrub reads; it also waits while blobs are being
        sent to clients.
      '';
    };

    logFormat = mkOption {
      type = types.enum [
        "text"
        "json"
      ];
      default = "text";
      description = "Format of the log lines nixery writes to the journal.";
    };

    layerBudget = mkOption {
      type = types.ints.between 1 124;
      default = 94;
      description = "Most layers of store paths per image; the symlink layer comes on top.";
    };

    layering = mkOption {
      type = types.enum [
        "exclusive"
        "largest"
        "popularity-contest"
        "nixery"
      ];
      default = "exclusive";
      description = "How store paths are grouped into layers; `nixery` is the original's.";
    };

    cacheTtl = mkOption {
      type = types.ints.unsigned;
      default = 300;
      description = ''
        Seconds a build from a moving source (path, channel name, branch)
        is served from cache before Nix is asked again.
      '';
    };

    nixOptions = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        keep-going = "true";
      };
      description = ''
        Options passed to every Nix call as `--option NAME VALUE`. The
        nix-daemon ignores most of them from users it does not trust; set
        system-wide ones in {option}`nix.settings` instead.
      '';
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        RUST_LOG = "nixery=debug,info";
      };
      description = "Further environment variables of the service; they override the ones above.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery.env";
      description = ''
        Absolute path of a file of `NAME=value` lines read when the service
        starts, for secrets such as a `NIXERY_PKGS_REPO` URL with a token;
        it overrides the other settings. Give it as a string so that it is
        not copied into the world-readable Nix store.
      '';
    };

    htpasswdFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixery.htpasswd";
      description = ''
        Absolute path of an htpasswd file with bcrypt entries (`htpasswd
        -B`); when set, pulls and the admin page need HTTP Basic
        credentials from it (`docker login`). The service reads it as a
        systemd credential (`LoadCredential=`), so give it as a string: it
        never enters the Nix store. After changing the file, restart the
        service: the credential is a copy made at start.
      '';
    };

    tls = {
      certFile = nullOrStr ''
        Absolute path of a PEM certificate chain (the server's certificate
        first): serve HTTPS, with {option}`services.nixery.tls.keyFile`.
        Handed to the service as a credential (`LoadCredential=`): a copy
        made at start, so restart the service after replacing it. For a
        LAN without a PKI, `nixery tls init` writes a private CA and such
        a pair.
      '' "/var/lib/nixery-tls/server.crt";

      keyFile = nullOrStr ''
        Absolute path of the private key of {option}`services.nixery.tls.certFile`
        (PKCS#8, RSA or EC PEM), outside the Nix store.
      '' "/run/secrets/nixery-tls.key";

      acmeHost = nullOrStr ''
        Serve HTTPS with the certificate `security.acme` obtains for this
        host (declare it in `security.acme.certs`, or through a virtual
        host's `enableACME`); the service restarts when it is renewed
        (requests in flight finish first). Instead of
        {option}`services.nixery.tls.certFile` and `keyFile`.
      '' "registry.example.org";
    };

    metricsPublic = mkOption {
      type = types.bool;
      default = false;
      description = ''
        With {option}`services.nixery.htpasswdFile`: leave `/metrics` open
        to scrapers without credentials.
      '';
    };

    nixCache = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Serve the store paths of every image as a signed Nix binary
          cache under `/nix-cache` (substituters = http://HOST:PORT/nix-cache
          on the LAN's machines). Needs
          {option}`services.nixery.nixCache.secretKeyFile`.
        '';
      };
      secretKeyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixery-cache.secret";
        description = ''
          Absolute path of the cache's secret key (`nixery nix-cache key
          --name NAME` or `nix-store --generate-binary-cache-key` writes
          one). Read as a systemd credential (`LoadCredential=`), so give it
          as a string: it never enters the Nix store. Clients list the
          public half in `trusted-public-keys`.
        '';
      };
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether to run `nixery check-config` on the settings when the
        system is built. Turn it off for cross builds, where the build
        machine cannot run the package.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        # None set runs a mirror: it serves only what was imported.
        assertion = builtins.length sourcesSet <= 1;
        message = "services.nixery: set at most one package source of channel, pkgsRepo, pkgsPath and flake (none for a mirror); set: ${concatStringsSep ", " sourcesSet}.";
      }
      {
        assertion = hasPrefix "/" cfg.storagePath;
        message = "services.nixery.storagePath must be an absolute path, got ${cfg.storagePath}.";
      }
      {
        assertion =
          cfg.environmentFile == null
          || (hasPrefix "/" cfg.environmentFile && !hasPrefix "${builtins.storeDir}/" cfg.environmentFile);
        message = "services.nixery.environmentFile must be an absolute path outside the Nix store (it holds secrets).";
      }
      {
        assertion =
          cfg.htpasswdFile == null
          || (hasPrefix "/" cfg.htpasswdFile && !hasPrefix "${builtins.storeDir}/" cfg.htpasswdFile);
        message = "services.nixery.htpasswdFile must be an absolute path outside the Nix store (it holds password hashes).";
      }
      {
        assertion = lib.all (n: builtins.match "[^=;]+" n != null) (builtins.attrNames cfg.nixOptions)
          && lib.all (v: !lib.hasInfix ";" v) (builtins.attrValues cfg.nixOptions);
        message = "services.nixery.nixOptions: names may not contain `=` or `;`, values not `;`.";
      }
      {
        assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
        message = "services.nixery.tls.certFile and tls.keyFile go together: set both or neither.";
      }
      {
        assertion = acmeHost == null || (cfg.tls.certFile == null && cfg.tls.keyFile == null);
        message = "services.nixery: set tls.acmeHost or tls.certFile/tls.keyFile, not both.";
      }
      {
        assertion = outsideStore cfg.tls.certFile && outsideStore cfg.tls.keyFile;
        message = "services.nixery.tls.certFile and tls.keyFile must be absolute paths outside the Nix store (the key is a secret).";
      }
      {
        assertion =
          !cfg.nixCache.enable
          || (
            cfg.nixCache.secretKeyFile != null
            && hasPrefix "/" cfg.nixCache.secretKeyFile
            && !hasPrefix "${builtins.storeDir}/" cfg.nixCache.secretKeyFile
          );
        message = "services.nixery.nixCache.enable needs nixCache.secretKeyFile: an absolute path outside the Nix store (it is a secret key).";
      }
      {
        assertion = config.nix.enable;
        message = "services.nixery builds through the nix-daemon and needs nix.enable.";
      }
      {
        assertion = cfg.storageBackend != "s3" || cfg.s3Bucket != null;
        message = "services.nixery: storageBackend = \"s3\" needs s3Bucket.";
      }
    ];

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    # A renewal restarts the service, which then copies the new files.
    security.acme.certs = mkIf (acmeHost != null) {
      ${acmeHost}.reloadServices = [ "nixery.service" ];
    };

    systemd.services.nixery = {
      description = "Nixery container registry";
      wantedBy = [ "multi-user.target" ];
      after = [
        "network.target"
        "nix-daemon.socket"
      ]
      ++ acmeUnits;
      wants = acmeUnits;
      requires = [ "nix-daemon.socket" ];
      inherit environment;

      serviceConfig = hardening // {
        # nixery sends READY=1 once it listens, STOPPING=1 on SIGTERM.
        Type = "notify";
        ExecStart = "${executable} serve";
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
        LoadCredential = mkIf (credentials != [ ]) credentials;
        Restart = "on-failure";
        RestartSec = 5;
        StateDirectory = mkIf storageInStateDir (lib.removePrefix stateDir cfg.storagePath);
        ReadWritePaths = mkIf (!storageInStateDir) [ cfg.storagePath ];
        CacheDirectory = "nixery";
        WorkingDirectory = cacheDir;
        LimitNOFILE = 65536;
      };
    };

    # The bucket is shared: any replica may collect it. Several timers
    # are harmless, as one collection runs at a time (the others exit 75).
    systemd.services.nixery-bucket-gc = mkIf collectsBucket {
      description = "Garbage collection of nixery's S3 bucket";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      environment = filterAttrs (_: v: v != null) (
        s3Environment
        // {
          NIXERY_MAX_STORAGE = cfg.s3MaxStorage;
          NIXERY_GC_KEEP_RECENT = toString cfg.s3CollectKeepRecent;
        }
      );
      serviceConfig = hardening // {
        Type = "oneshot";
        ExecStart = "${nixery} gc";
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
        SuccessExitStatus = [ 75 ];
      };
    };

    systemd.timers.nixery-bucket-gc = mkIf collectsBucket {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.s3CollectSchedule;
        RandomizedDelaySec = "30m";
        Persistent = true;
      };
    };
  };
}

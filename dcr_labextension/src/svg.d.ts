// SVG files are bundled as strings by JupyterLab's builder (webpack's asset/source rule).
declare module '*.svg' {
  const value: string;
  export default value;
}
